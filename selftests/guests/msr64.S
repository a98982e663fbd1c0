/* SPDX-License-Identifier: GPL-2.0 */
/*
 * MSRs rvmm switches by hand: the guest sets KERNEL_GS_BASE and LSTAR, swaps GS bases
 * with SWAPGS (no exit), makes exits (one per character printed), and checks that the
 * values are still its own.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set KGS, 0xc0000102
	.set GSB, 0xc0000101
	.set LSTAR, 0xc0000082
_start:
	mov	ecx, GSB
	mov	eax, 0x11110000
	mov	edx, 0x1111
	wrmsr
	mov	ecx, KGS
	mov	eax, 0x22220000
	mov	edx, 0x2222
	wrmsr
	mov	ecx, LSTAR
	mov	eax, 0x33330000
	mov	edx, 0xffff8000
	wrmsr
	swapgs				/* GS base 0x2222_2222_0000, KGS 0x1111_1111_0000 */
	lea	rsi, [rip + msg]
	call	puts
	mov	ecx, GSB
	rdmsr
	cmp	edx, 0x2222
	jne	fail
	mov	ecx, KGS
	rdmsr
	cmp	edx, 0x1111
	jne	fail
	swapgs
	lea	rsi, [rip + msg2]
	call	puts
	mov	ecx, KGS
	rdmsr
	cmp	edx, 0x2222
	jne	fail
	mov	ecx, LSTAR
	rdmsr
	cmp	edx, 0xffff8000
	jne	fail
	cmp	eax, 0x33330000
	jne	fail
	lea	rsi, [rip + ok]
	call	puts
	mov	al, 0x2d
	out	0xf4, al
	hlt
fail:
	lea	rsi, [rip + bad]
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt
puts:
	mov	dx, 0x3f8
1:	lodsb
	test	al, al
	jz	2f
	out	dx, al
	jmp	1b
2:	ret

	.data
msg:	.asciz	"msr64: swapped GS bases, exiting\n"
msg2:	.asciz	"swapped back\n"
ok:	.asciz	"KERNEL_GS_BASE and LSTAR survived the exits\n"
bad:	.asciz	"FAILED\n"
