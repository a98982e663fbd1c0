/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Hardware task switches in 32-bit protected mode: JMP to a TSS and back, CALL to a
 * TSS and IRET back (NT and the back link), INT n through a task gate in the IDT, and a
 * #DE through a task gate whose handler task fixes the faulting task's saved ECX so
 * that its DIV runs again. It checks the busy bits, NT, CR0.TS and the registers the
 * switches keep, printing each step to COM1; the exit code is 0x2a.
 */
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
	.set MB_FLAGS, 0
	.set SEL_MAIN, 0x18
	.set SEL_B, 0x20
	.set SEL_C, 0x28
	.set SEL_D, 0x30
	.balign 4
mbh:	.long	0x1badb002, MB_FLAGS, -(0x1badb002 + MB_FLAGS)
_start:
	mov	esp, 0x8000
	/* The TSS descriptors' bases. */
	lea	edi, [gdt + SEL_MAIN]
	lea	eax, tss_main
	call	set_base
	lea	edi, [gdt + SEL_B]
	lea	eax, tss_b
	call	set_base
	lea	edi, [gdt + SEL_C]
	lea	eax, tss_c
	call	set_base
	lea	edi, [gdt + SEL_D]
	lea	eax, tss_d
	call	set_base
	lgdt	[gdtr]
	lidt	[idtr]
	jmp	0x08:1f
1:	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	mov	fs, ax
	mov	gs, ax
	mov	ax, SEL_MAIN
	ltr	ax
	lea	esi, s_hello
	call	puts
	mov	ebx, 0x12345678
	mov	ebp, 0x9abcdef0

	/* JMP to task B, which JMPs back: both TSSs available but the running one. */
	jmp	SEL_B:0
	lea	esi, s_back_jmp
	call	puts
	cmp	byte ptr [gdt + SEL_B + 5], 0x89
	jne	fail
	cmp	byte ptr [gdt + SEL_MAIN + 5], 0x8b
	jne	fail

	/* CALL to task B, which returns by IRET (NT set, back link to us). */
	call	SEL_B:0
	lea	esi, s_back_call
	call	puts
	pushfd
	pop	eax
	test	eax, 1 << 14
	jnz	fail
	cmp	byte ptr [gdt + SEL_B + 5], 0x89
	jne	fail

	/* INT 0x40 through a task gate to task C. */
	int	0x40
	lea	esi, s_back_int
	call	puts

	/* #DE through a task gate to task D, which sets our saved ECX to 5. */
	mov	eax, 100
	xor	edx, edx
	xor	ecx, ecx
	div	ecx
	cmp	eax, 20
	jne	fail
	lea	esi, s_back_de
	call	puts

	/* A task switch sets CR0.TS; the registers survived the round trips. */
	smsw	ax
	test	al, 8
	jz	fail
	clts
	cmp	ebx, 0x12345678
	jne	fail
	cmp	ebp, 0x9abcdef0
	jne	fail
	cmp	dword ptr [counter], 4
	jne	fail
	lea	esi, s_done
	call	puts
	mov	al, 0x2a
	out	0xf4, al
	hlt

fail:	lea	esi, s_fail
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt

/* Task B: entered first by JMP (goes back by JMP), then by CALL (back by IRET). */
task_b:
	inc	dword ptr [counter]
	lea	esi, s_b_jmp
	call	puts
	jmp	SEL_MAIN:0
	inc	dword ptr [counter]
	pushfd
	pop	eax
	test	eax, 1 << 14
	jz	fail
	cmp	word ptr [tss_b], SEL_MAIN
	jne	fail
	lea	esi, s_b_call
	call	puts
	iret
	jmp	fail

/* Task C: INT 0x40's task gate. */
task_c:
	inc	dword ptr [counter]
	lea	esi, s_c
	call	puts
	iret
	jmp	fail

/* Task D: #DE's task gate: the faulting task's ECX (in its TSS) becomes 5. */
task_d:
	inc	dword ptr [counter]
	lea	esi, s_d
	call	puts
	mov	dword ptr [tss_main + 0x2c], 5
	iret
	jmp	fail

/* set_base(edi = descriptor, eax = base). */
set_base:
	mov	[edi + 2], ax
	shr	eax, 16
	mov	[edi + 4], al
	mov	[edi + 7], ah
	ret

/* puts(esi): COM1. */
puts:	lodsb
	test	al, al
	jz	2f
	mov	dx, 0x3f8
	out	dx, al
	jmp	puts
2:	ret

	.data
	.balign 8
gdt:	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: code */
	.quad	0x00cf92000000ffff	/* 0x10: data */
	.quad	0x0000890000000067	/* 0x18: main task's TSS */
	.quad	0x0000890000000067	/* 0x20: task B */
	.quad	0x0000890000000067	/* 0x28: task C */
	.quad	0x0000890000000067	/* 0x30: task D */
gdt_end:
gdtr:	.word	gdt_end - gdt - 1
	.long	gdt
	.balign 8
/* Task gates: #DE to task D, 0x40 to task C (DPL 0). */
idt:	.long	SEL_D << 16, 0x8500
	.fill	0x3f, 8, 0
	.long	SEL_C << 16, 0x8500
idt_end:
idtr:	.word	idt_end - idt - 1
	.long	idt

.macro TSS eip, esp
	.long	0			/* back link */
	.long	0, 0, 0, 0, 0, 0	/* ESP0, SS0, ESP1, SS1, ESP2, SS2 */
	.long	0			/* CR3 */
	.long	\eip, 2			/* EIP, EFLAGS */
	.long	0, 0, 0, 0, \esp, 0, 0, 0	/* EAX ECX EDX EBX ESP EBP ESI EDI */
	.long	0x10, 0x08, 0x10, 0x10, 0x10, 0x10	/* ES CS SS DS FS GS */
	.long	0			/* LDT */
	.word	0, 0x68			/* T, I/O map base */
.endm
	.balign 16
tss_main: TSS 0, 0
tss_b:	TSS task_b, 0x7000
tss_c:	TSS task_c, 0x6000
tss_d:	TSS task_d, 0x5000
counter: .long 0
s_hello: .asciz	"task32: hardware task switches\n"
s_b_jmp: .asciz	"task B: entered by JMP\n"
s_back_jmp: .asciz "main: back by JMP, task B available again\n"
s_b_call: .asciz "task B: entered by CALL, NT set, back link to main\n"
s_back_call: .asciz "main: back by IRET, NT clear, task B available\n"
s_c:	.asciz	"task C: INT 0x40 through a task gate\n"
s_back_int: .asciz "main: back from task C\n"
s_d:	.asciz	"task D: #DE through a task gate, ECX fixed\n"
s_back_de: .asciz "main: DIV ran again, 100 / 5 = 20\n"
s_done:	.asciz	"CR0.TS set, registers kept\n"
s_fail:	.asciz	"task32: wrong result\n"
