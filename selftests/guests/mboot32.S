/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A multiboot (v1) kernel in an ELF32 file: checks the bootloader magic, prints what the
 * multiboot information says (upper memory, the command line after the image path, the
 * modules' first lines, the memory map's size), then switches itself from 32-bit
 * protected mode with paging off to long mode (PAE, EFER.LME, CR0.PG) and ends there.
 */
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
	.set MB_FLAGS, 3			/* page-aligned modules, memory information */
	.set PT, 0x200000			/* PML4, PDPT, PD */
	.balign 4
mbh:	.long	0x1badb002, MB_FLAGS, -(0x1badb002 + MB_FLAGS)
_start:
	mov	esp, 0x8000
	cmp	eax, 0x2badb002
	jne	fail
	mov	ebp, ebx
	lea	esi, s_magic
	call	puts
	test	dword ptr [ebp], 1
	jz	fail
	lea	esi, s_mem
	call	puts
	mov	eax, [ebp + 8]
	call	putdec
	lea	esi, s_kib
	call	puts
	/* The command line after the image path. */
	lea	esi, s_args
	call	puts
	mov	esi, [ebp + 16]
1:	lodsb
	test	al, al
	jz	2f
	cmp	al, ' '
	jne	1b
	mov	al, ' '
	call	putc
	call	puts
2:	call	nl
	/* Modules: each one's first line. */
	lea	esi, s_mods
	call	puts
	mov	eax, [ebp + 20]
	call	putdec
	call	nl
	mov	edi, [ebp + 24]
	mov	ebx, [ebp + 20]
3:	test	ebx, ebx
	jz	5f
	lea	esi, s_mod
	call	puts
	mov	esi, [edi]
	mov	ecx, [edi + 4]
4:	cmp	esi, ecx
	jae	6f
	lodsb
	cmp	al, '\n'
	je	6f
	call	putc
	jmp	4b
6:	call	nl
	add	edi, 16
	dec	ebx
	jmp	3b
5:	lea	esi, s_mmap
	call	puts
	mov	eax, [ebp + 44]
	xor	edx, edx
	mov	ecx, 24
	div	ecx
	call	putdec
	call	nl

	/* Long mode from paging off: identity-map 1 GiB with 2-MiB pages. */
	mov	dword ptr [PT], PT + 0x1003
	mov	dword ptr [PT + 0x1000], PT + 0x2003
	xor	ecx, ecx
7:	mov	eax, ecx
	shl	eax, 21
	or	eax, 0x83
	mov	[PT + 0x2000 + ecx * 8], eax
	inc	ecx
	cmp	ecx, 512
	jne	7b
	mov	eax, PT
	mov	cr3, eax
	mov	eax, cr4
	or	eax, 1 << 5			/* PAE */
	mov	cr4, eax
	mov	ecx, 0xc0000080
	rdmsr
	or	eax, 1 << 8			/* LME */
	wrmsr
	lgdt	[gdtr]
	mov	eax, cr0
	or	eax, 1 << 31			/* PG: IA-32e mode */
	mov	cr0, eax
	.byte	0xea				/* ljmp 0x8:long64 */
	.long	long64
	.word	0x8

fail:
	lea	esi, s_fail
	call	puts
	mov	al, 0x2d
	out	0xf4, al
	hlt

nl:	mov	al, '\n'
putc:	mov	dx, 0x3f8
	out	dx, al
	ret
puts:	lodsb
	test	al, al
	jz	8f
	call	putc
	jmp	puts
8:	ret
/* putdec(eax) */
putdec:	mov	edi, offset decbuf + 15
	mov	byte ptr [edi], 0
	mov	ecx, 10
9:	xor	edx, edx
	div	ecx
	add	dl, '0'
	dec	edi
	mov	[edi], dl
	test	eax, eax
	jnz	9b
	mov	esi, edi
	jmp	puts

	.code64
long64:
	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	lea	rsi, [rip + s_long]
	mov	dx, 0x3f8
10:	lodsb
	test	al, al
	jz	11f
	out	dx, al
	jmp	10b
11:	xor	ebx, ebx
	xor	ebp, ebp
	mov	al, 0x2e
	out	0xf4, al
	hlt

	.data
	.balign	8
gdt:	.quad	0, 0x00af9a000000ffff, 0x00cf92000000ffff
gdtr:	.word	3 * 8 - 1
	.long	gdt
decbuf:	.space	16
s_magic: .asciz	"mboot32: multiboot magic ok\n"
s_mem:	.asciz	"mem_upper: "
s_kib:	.asciz	" KiB\n"
s_args:	.asciz	"args:"
s_mods:	.asciz	"modules: "
s_mod:	.asciz	"module: "
s_mmap:	.asciz	"mmap entries: "
s_long:	.asciz	"long mode: ok\n"
s_fail:	.asciz	"FAILED\n"
